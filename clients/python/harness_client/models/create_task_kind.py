from enum import StrEnum

class CreateTaskKind(StrEnum):
    AGENT = "agent"
    COMMAND = "command"
    ECHO = "echo"
    NOOP = "noop"
    SLEEP = "sleep"

    def __str__(self) -> str:
        return str(self.value)
