def attend_one(client, seq_id, layer, q, q_codes, hi, timeout=None):
    """One sequence's attention through MagicPIG's batched call (``LSHClient.attend``):
    ``(out [Hq, D], lse [Hq])``."""
    out, lse = client.attend(layer, [seq_id], q[None], q_codes[None], [hi]).result(timeout)
    return out[0], lse[0]
