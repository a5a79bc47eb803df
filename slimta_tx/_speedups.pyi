SOURCE_HASH: str

def scan(
    work: bytes, start: int, find_end: bool, unstuff: bool, max_line: int, /
) -> tuple[bytes, int, bool, bool] | None: ...
