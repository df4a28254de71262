"""The one error type users see: a one-line message that names the problem and the fix."""


class UserError(Exception):
    """Bad input (preset, option, dataset, model, run folder). The CLI prints it on one line and exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        # one line, always: a multi-line message would hide the fix in a wall of text
        super().__init__(" ".join(str(message).split()))
