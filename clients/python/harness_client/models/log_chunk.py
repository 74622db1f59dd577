from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, BinaryIO, TextIO, TYPE_CHECKING, Generator

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

from ..models.stream import Stream
from typing import cast
import datetime






T = TypeVar("T", bound="LogChunk")



@_attrs_define
class LogChunk:
    """ One stored chunk of an attempt's output, as readers see it.

        Attributes:
            at (datetime.datetime):
            attempt (int):
            seq (int): Orders the chunks of one attempt, across its streams.
            skipped (int): Bytes of this stream dropped just before this chunk (between its head and its tail).
            stream (Stream): Which stream a chunk of output came from: stdout, stderr, or progress (a progress report,
                its data the JSON of a [`Progress`]).
            text (str): The chunk's bytes as text (invalid UTF-8 shows as U+FFFD).
     """

    at: datetime.datetime
    attempt: int
    seq: int
    skipped: int
    stream: Stream
    text: str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)





    def to_dict(self) -> dict[str, Any]:
        at = self.at.isoformat()

        attempt = self.attempt

        seq = self.seq

        skipped = self.skipped

        stream = self.stream.value

        text = self.text


        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update({
            "at": at,
            "attempt": attempt,
            "seq": seq,
            "skipped": skipped,
            "stream": stream,
            "text": text,
        })

        return field_dict



    @classmethod
    def from_dict(cls: type[T], src_dict: Mapping[str, Any]) -> T:
        d = dict(src_dict)
        at = datetime.datetime.fromisoformat(d.pop("at"))




        attempt = d.pop("attempt")

        seq = d.pop("seq")

        skipped = d.pop("skipped")

        stream = Stream(d.pop("stream"))




        text = d.pop("text")

        log_chunk = cls(
            at=at,
            attempt=attempt,
            seq=seq,
            skipped=skipped,
            stream=stream,
            text=text,
        )


        log_chunk.additional_properties = d
        return log_chunk

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
