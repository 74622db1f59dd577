from http import HTTPStatus
from typing import Any, cast
from urllib.parse import quote

import httpx

from ...client import AuthenticatedClient, Client
from ...types import Response, UNSET
from ... import errors

from ...models.error import Error
from ...models.task_logs import TaskLogs
from ...types import UNSET, Unset
from typing import cast



def _get_kwargs(
    task_id: int,
    *,
    follow: bool | Unset = UNSET,
    after: str | Unset = UNSET,

) -> dict[str, Any]:
    

    

    params: dict[str, Any] = {}

    params["follow"] = follow

    params["after"] = after


    params = {k: v for k, v in params.items() if v is not UNSET and v is not None}


    _kwargs: dict[str, Any] = {
        "method": "get",
        "url": "/api/tasks/{task_id}/logs".format(task_id=quote(str(task_id), safe=""),),
        "params": params,
    }


    return _kwargs



def _parse_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Error | TaskLogs | None:
    if response.status_code == 200:
        response_200 = TaskLogs.from_dict(response.json())



        return response_200

    if response.status_code == 401:
        response_401 = Error.from_dict(response.json())



        return response_401

    if response.status_code == 404:
        response_404 = Error.from_dict(response.json())



        return response_404

    if response.status_code == 422:
        response_422 = Error.from_dict(response.json())



        return response_422

    if response.status_code == 500:
        response_500 = Error.from_dict(response.json())



        return response_500

    if response.status_code == 503:
        response_503 = Error.from_dict(response.json())



        return response_503

    if client.raise_on_unexpected_status:
        raise errors.UnexpectedStatus(response.status_code, response.content)
    else:
        return None


def _build_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Response[Error | TaskLogs]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    task_id: int,
    *,
    client: AuthenticatedClient,
    follow: bool | Unset = UNSET,
    after: str | Unset = UNSET,

) -> Response[Error | TaskLogs]:
    """ A task's stored output (stdout, stderr and progress, per attempt, head and tail kept); with
    follow=true, Server-Sent Events until the task ends

    Args:
        task_id (int):
        follow (bool | Unset):
        after (str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | TaskLogs]
     """


    kwargs = _get_kwargs(
        task_id=task_id,
follow=follow,
after=after,

    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)

def sync(
    task_id: int,
    *,
    client: AuthenticatedClient,
    follow: bool | Unset = UNSET,
    after: str | Unset = UNSET,

) -> Error | TaskLogs | None:
    """ A task's stored output (stdout, stderr and progress, per attempt, head and tail kept); with
    follow=true, Server-Sent Events until the task ends

    Args:
        task_id (int):
        follow (bool | Unset):
        after (str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | TaskLogs
     """


    return sync_detailed(
        task_id=task_id,
client=client,
follow=follow,
after=after,

    ).parsed

async def asyncio_detailed(
    task_id: int,
    *,
    client: AuthenticatedClient,
    follow: bool | Unset = UNSET,
    after: str | Unset = UNSET,

) -> Response[Error | TaskLogs]:
    """ A task's stored output (stdout, stderr and progress, per attempt, head and tail kept); with
    follow=true, Server-Sent Events until the task ends

    Args:
        task_id (int):
        follow (bool | Unset):
        after (str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | TaskLogs]
     """


    kwargs = _get_kwargs(
        task_id=task_id,
follow=follow,
after=after,

    )

    response = await client.get_async_httpx_client().request(
        **kwargs
    )

    return _build_response(client=client, response=response)

async def asyncio(
    task_id: int,
    *,
    client: AuthenticatedClient,
    follow: bool | Unset = UNSET,
    after: str | Unset = UNSET,

) -> Error | TaskLogs | None:
    """ A task's stored output (stdout, stderr and progress, per attempt, head and tail kept); with
    follow=true, Server-Sent Events until the task ends

    Args:
        task_id (int):
        follow (bool | Unset):
        after (str | Unset):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | TaskLogs
     """


    return (await asyncio_detailed(
        task_id=task_id,
client=client,
follow=follow,
after=after,

    )).parsed
