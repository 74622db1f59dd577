from enum import StrEnum

class RuntimeKind(StrEnum):
    COMMAND = "command"
    PYTHON = "python"

    def __str__(self) -> str:
        return str(self.value)
