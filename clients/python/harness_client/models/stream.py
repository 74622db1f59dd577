from enum import StrEnum

class Stream(StrEnum):
    PROGRESS = "progress"
    STDERR = "stderr"
    STDOUT = "stdout"

    def __str__(self) -> str:
        return str(self.value)
