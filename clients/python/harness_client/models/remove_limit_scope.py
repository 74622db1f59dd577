from enum import StrEnum

class RemoveLimitScope(StrEnum):
    AGENT = "agent"
    KEY = "key"
    KIND = "kind"
    QUEUE = "queue"

    def __str__(self) -> str:
        return str(self.value)
