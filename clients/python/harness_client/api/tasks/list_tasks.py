from http import HTTPStatus
from typing import Any, cast
from urllib.parse import quote

import httpx

from ...client import AuthenticatedClient, Client
from ...types import Response, UNSET
from ... import errors

from ...models.error import Error
from ...models.status import Status
from ...models.task import Task
from ...types import UNSET, Unset
from typing import cast



def _get_kwargs(
    *,
    status: Status | Unset = UNSET,
    kind: str | Unset = UNSET,
    agent_id: int | Unset = UNSET,
    limit: int | Unset = 50,
    offset: int | Unset = 0,

) -> dict[str, Any]:
    

    

    params: dict[str, Any] = {}

    json_status: str | Unset = UNSET
    if not isinstance(status, Unset):
        json_status = status.value

    params["status"] = json_status

    params["kind"] = kind

    params["agent_id"] = agent_id

    params["limit"] = limit

    params["offset"] = offset


    params = {k: v for k, v in params.items() if v is not UNSET and v is not None}


    _kwargs: dict[str, Any] = {
        "method": "get",
        "url": "/api/tasks",
        "params": params,
    }


    return _kwargs



def _parse_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Error | list[Task] | None:
    if response.status_code == 200:
        response_200 = []
        _response_200 = response.json()
        for componentsschemas_task_list_item_data in (_response_200):
            componentsschemas_task_list_item = Task.from_dict(componentsschemas_task_list_item_data)



            response_200.append(componentsschemas_task_list_item)

        return response_200

    if response.status_code == 401:
        response_401 = Error.from_dict(response.json())



        return response_401

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


def _build_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Response[Error | list[Task]]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    *,
    client: AuthenticatedClient,
    status: Status | Unset = UNSET,
    kind: str | Unset = UNSET,
    agent_id: int | Unset = UNSET,
    limit: int | Unset = 50,
    offset: int | Unset = 0,

) -> Response[Error | list[Task]]:
    """ Tasks, newest first

    Args:
        status (Status | Unset): Where a task is in its lifecycle
        kind (str | Unset):
        agent_id (int | Unset):
        limit (int | Unset):  Default: 50.
        offset (int | Unset):  Default: 0.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | list[Task]]
     """


    kwargs = _get_kwargs(
        status=status,
kind=kind,
agent_id=agent_id,
limit=limit,
offset=offset,

    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)

def sync(
    *,
    client: AuthenticatedClient,
    status: Status | Unset = UNSET,
    kind: str | Unset = UNSET,
    agent_id: int | Unset = UNSET,
    limit: int | Unset = 50,
    offset: int | Unset = 0,

) -> Error | list[Task] | None:
    """ Tasks, newest first

    Args:
        status (Status | Unset): Where a task is in its lifecycle
        kind (str | Unset):
        agent_id (int | Unset):
        limit (int | Unset):  Default: 50.
        offset (int | Unset):  Default: 0.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | list[Task]
     """


    return sync_detailed(
        client=client,
status=status,
kind=kind,
agent_id=agent_id,
limit=limit,
offset=offset,

    ).parsed

async def asyncio_detailed(
    *,
    client: AuthenticatedClient,
    status: Status | Unset = UNSET,
    kind: str | Unset = UNSET,
    agent_id: int | Unset = UNSET,
    limit: int | Unset = 50,
    offset: int | Unset = 0,

) -> Response[Error | list[Task]]:
    """ Tasks, newest first

    Args:
        status (Status | Unset): Where a task is in its lifecycle
        kind (str | Unset):
        agent_id (int | Unset):
        limit (int | Unset):  Default: 50.
        offset (int | Unset):  Default: 0.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | list[Task]]
     """


    kwargs = _get_kwargs(
        status=status,
kind=kind,
agent_id=agent_id,
limit=limit,
offset=offset,

    )

    response = await client.get_async_httpx_client().request(
        **kwargs
    )

    return _build_response(client=client, response=response)

async def asyncio(
    *,
    client: AuthenticatedClient,
    status: Status | Unset = UNSET,
    kind: str | Unset = UNSET,
    agent_id: int | Unset = UNSET,
    limit: int | Unset = 50,
    offset: int | Unset = 0,

) -> Error | list[Task] | None:
    """ Tasks, newest first

    Args:
        status (Status | Unset): Where a task is in its lifecycle
        kind (str | Unset):
        agent_id (int | Unset):
        limit (int | Unset):  Default: 50.
        offset (int | Unset):  Default: 0.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | list[Task]
     """


    return (await asyncio_detailed(
        client=client,
status=status,
kind=kind,
agent_id=agent_id,
limit=limit,
offset=offset,

    )).parsed
