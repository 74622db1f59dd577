from enum import StrEnum

class GovernorState(StrEnum):
    HOLDING = "holding"
    NORMAL = "normal"
    PAUSED = "paused"
    THROTTLED = "throttled"

    def __str__(self) -> str:
        return str(self.value)
