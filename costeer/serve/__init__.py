"""``costeer serve``: the embedded cloud for one machine (server, wire protocol, score op).
"""
