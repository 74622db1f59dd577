from enum import StrEnum

class AttemptStatus(StrEnum):
    CANCELLED = "cancelled"
    FAILED = "failed"
    LOST = "lost"
    TIMEOUT = "timeout"

    def __str__(self) -> str:
        return str(self.value)
