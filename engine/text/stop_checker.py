"""Stop strings over streamed text: release what is decided, hold back what may be a stop.

Text arrives in pieces of any size. A stop string can span pieces, so the tail of the
text that could still grow into a stop string is held back until the next piece
decides it. The first stop string to be *completed* in the text ends the sequence
(ties, stops ending at the same character, go to the longest), which makes the result
independent of how the text was cut into pieces.
"""

from __future__ import annotations


class StopChecker:
    """Feed a sequence's new text; get back the text safe to release and any stop hit."""

    def __init__(self, stop_strings: list[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must not be empty")
        self._stops = list(dict.fromkeys(stop_strings))   # unique, in order
        self._include = include_stop_str_in_output
        self._pending = ""    # held-back text: the longest tail that begins a stop string
        self._stopped = False

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text to release now, the stop string matched or None).

        After a match the sequence is over: later calls release nothing.
        """
        if self._stopped:
            return "", None
        if not self._stops:
            return text, None
        buf = self._pending + text
        match = self._first_completed(buf)
        if match is not None:
            start, stop = match
            self._stopped, self._pending = True, ""
            return buf[:start + len(stop) if self._include else start], stop
        held = self._partial_stop_len(buf)
        self._pending = buf[len(buf) - held:] if held else ""
        return buf[:len(buf) - held], None

    def flush(self) -> str:
        """Release the held-back tail (the sequence ended for another reason)."""
        tail, self._pending = self._pending, ""
        return "" if self._stopped else tail

    def _first_completed(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the stop string whose first occurrence ends earliest."""
        best: tuple[int, int, str] | None = None   # (end, -length, stop): smallest wins
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop), stop)
                best = key if best is None or key < best else best
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:k]):
                    longest = k
                    break
        return longest
