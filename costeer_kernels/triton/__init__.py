"""The Triton backend: ``steer.py`` (the steer op, closed form and iterative, optionally through a
vocabulary map), ``sample.py`` (steer + token choice in one launch), ``projection.py`` (the
vocabulary projection fused with the steer), ``common.py`` (shared helpers and status bits)."""


def register() -> None:
    """Register "triton" in the backend registry (imports triton: raises if it is missing)."""
    from .. import registry
    from .sample import sample_triton
    from .steer import INTERPRET, steer_triton, steer_triton_mapped

    def runs_on(device):
        return device.type == "cuda" or (device.type == "cpu" and INTERPRET)

    def steer_hidden_triton(zl, hc, hn, weight, hp, out, slm_index=None, drop=False):
        from .projection import steer_projection_triton

        return steer_projection_triton(zl, hc, hn, weight, hp, out, slm_index=slm_index, drop_unmapped=drop)

    registry.register_backend("triton", runs_on, steer=steer_triton, steer_mapped=steer_triton_mapped,
                              sample=sample_triton, steer_hidden=steer_hidden_triton)
