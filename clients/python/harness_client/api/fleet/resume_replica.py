from http import HTTPStatus
from typing import Any, cast
from urllib.parse import quote

import httpx

from ...client import AuthenticatedClient, Client
from ...types import Response, UNSET
from ... import errors

from ...models.error import Error
from ...models.resumed import Resumed
from typing import cast



def _get_kwargs(
    replica_id: str,

) -> dict[str, Any]:
    

    

    

    _kwargs: dict[str, Any] = {
        "method": "post",
        "url": "/api/fleet/{replica_id}/resume".format(replica_id=quote(str(replica_id), safe=""),),
    }


    return _kwargs



def _parse_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Error | Resumed | None:
    if response.status_code == 200:
        response_200 = Resumed.from_dict(response.json())



        return response_200

    if response.status_code == 401:
        response_401 = Error.from_dict(response.json())



        return response_401

    if response.status_code == 403:
        response_403 = Error.from_dict(response.json())



        return response_403

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


def _build_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Response[Error | Resumed]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    replica_id: str,
    *,
    client: AuthenticatedClient,

) -> Response[Error | Resumed]:
    """ Lift one replica's hold

    Args:
        replica_id (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | Resumed]
     """


    kwargs = _get_kwargs(
        replica_id=replica_id,

    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)

def sync(
    replica_id: str,
    *,
    client: AuthenticatedClient,

) -> Error | Resumed | None:
    """ Lift one replica's hold

    Args:
        replica_id (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | Resumed
     """


    return sync_detailed(
        replica_id=replica_id,
client=client,

    ).parsed

async def asyncio_detailed(
    replica_id: str,
    *,
    client: AuthenticatedClient,

) -> Response[Error | Resumed]:
    """ Lift one replica's hold

    Args:
        replica_id (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | Resumed]
     """


    kwargs = _get_kwargs(
        replica_id=replica_id,

    )

    response = await client.get_async_httpx_client().request(
        **kwargs
    )

    return _build_response(client=client, response=response)

async def asyncio(
    replica_id: str,
    *,
    client: AuthenticatedClient,

) -> Error | Resumed | None:
    """ Lift one replica's hold

    Args:
        replica_id (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | Resumed
     """


    return (await asyncio_detailed(
        replica_id=replica_id,
client=client,

    )).parsed
