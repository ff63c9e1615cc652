"""CoSteer's decoding loop in the layout transformers loads for ``custom_generate="<folder>"``.

    from costeer.hf_generate import CUSTOM_GENERATE_DIR
    llm.generate(input_ids, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, costeer=proc)

transformers hands this function the raw ``generate()`` arguments; it calls ``generate()`` again with
the loop of ``costeer.hf_generate`` as a callable, so transformers prepares the inputs as usual.
"""


def generate(model, **kwargs):
    from costeer.hf_generate import generate as costeer_loop

    kwargs.pop("custom_generate", None)
    return model.generate(custom_generate=costeer_loop, **kwargs)
