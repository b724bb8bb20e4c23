def attend_one(backend, seq_id, layer, q, q_codes, hi, timeout=None):
    """One sequence's attention through a backend's batched ``submit_attend``:
    ``(out [Hq, D], lse [Hq])``."""
    out, lse = backend.submit_attend(layer, [seq_id], q[None], q_codes[None], [hi]).result(timeout)
    return out[0], lse[0]
