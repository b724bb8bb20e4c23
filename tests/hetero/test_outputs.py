from hetero.outputs import Detokenizer, LogprobsOutput


class CharTokenizer:
    """One token per character; id 0 decodes to nothing (a special token)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def _ids(s):
    return [ord(c) for c in s]


def test_stop_string_cuts_text_and_stream_never_takes_back():
    d = Detokenizer(CharTokenizer(), stop=["END"])
    pieces, ids = [], []
    for c in "abc ENx EN":
        ids.append(ord(c))
        d.add(ids)
        pieces.append(d.delta())
    assert not d.stopped
    assert "".join(pieces) == "abc ENx "  # the trailing "EN" may still become "END"
    ids += _ids("D tail")
    d.add(ids)
    assert d.stopped and d.text == "abc ENx "
    assert "".join(pieces) + d.delta(final=True) == d.text


def test_partial_utf8_is_held_back():
    class Bytes(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    d = Detokenizer(Bytes(), stop=[])
    euro = list("€".encode())
    d.add(euro[:2])
    assert d.delta() == ""
    d.add(euro)
    assert d.delta() == "€"


def test_perplexity():
    out = LogprobsOutput([1, 2, 3], [-1.0, -3.0])
    assert abs(out.perplexity - 7.38905609893065) < 1e-9
