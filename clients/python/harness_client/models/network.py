from enum import StrEnum

class Network(StrEnum):
    ALLOW = "allow"
    NONE = "none"

    def __str__(self) -> str:
        return str(self.value)
