from http import HTTPStatus
from typing import Any, cast
from urllib.parse import quote

import httpx

from ...client import AuthenticatedClient, Client
from ...types import Response, UNSET
from ... import errors

from ...models.error import Error
from ...models.limit import Limit
from ...models.set_limit_scope import SetLimitScope
from ...models.set_limit_type_0 import SetLimitType0
from ...models.set_limit_type_1 import SetLimitType1
from typing import cast



def _get_kwargs(
    scope: SetLimitScope,
    target: str,
    *,
    body: SetLimitType0 | SetLimitType1,

) -> dict[str, Any]:
    headers: dict[str, Any] = {}


    

    

    _kwargs: dict[str, Any] = {
        "method": "put",
        "url": "/api/limits/{scope}/{target}".format(scope=quote(str(scope), safe=""),target=quote(str(target), safe=""),),
    }

    
    if isinstance(body, SetLimitType0):
        _kwargs["json"] = body.to_dict()
    else:
        _kwargs["json"] = body.to_dict()


    headers["Content-Type"] = "application/json"

    _kwargs["headers"] = headers
    return _kwargs



def _parse_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Error | Limit | None:
    if response.status_code == 200:
        response_200 = Limit.from_dict(response.json())



        return response_200

    if response.status_code == 400:
        response_400 = Error.from_dict(response.json())



        return response_400

    if response.status_code == 401:
        response_401 = Error.from_dict(response.json())



        return response_401

    if response.status_code == 403:
        response_403 = Error.from_dict(response.json())



        return response_403

    if response.status_code == 404:
        response_404 = Error.from_dict(response.json())



        return response_404

    if response.status_code == 413:
        response_413 = Error.from_dict(response.json())



        return response_413

    if response.status_code == 415:
        response_415 = Error.from_dict(response.json())



        return response_415

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


def _build_response(*, client: AuthenticatedClient | Client, response: httpx.Response) -> Response[Error | Limit]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    scope: SetLimitScope,
    target: str,
    *,
    client: AuthenticatedClient,
    body: SetLimitType0 | SetLimitType1,

) -> Response[Error | Limit]:
    """ Add or change a fleet-wide concurrency and/or rate limit

    Args:
        scope (SetLimitScope):
        target (str):
        body (SetLimitType0 | SetLimitType1): Give a concurrency, a rate, or both

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | Limit]
     """


    kwargs = _get_kwargs(
        scope=scope,
target=target,
body=body,

    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)

def sync(
    scope: SetLimitScope,
    target: str,
    *,
    client: AuthenticatedClient,
    body: SetLimitType0 | SetLimitType1,

) -> Error | Limit | None:
    """ Add or change a fleet-wide concurrency and/or rate limit

    Args:
        scope (SetLimitScope):
        target (str):
        body (SetLimitType0 | SetLimitType1): Give a concurrency, a rate, or both

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | Limit
     """


    return sync_detailed(
        scope=scope,
target=target,
client=client,
body=body,

    ).parsed

async def asyncio_detailed(
    scope: SetLimitScope,
    target: str,
    *,
    client: AuthenticatedClient,
    body: SetLimitType0 | SetLimitType1,

) -> Response[Error | Limit]:
    """ Add or change a fleet-wide concurrency and/or rate limit

    Args:
        scope (SetLimitScope):
        target (str):
        body (SetLimitType0 | SetLimitType1): Give a concurrency, a rate, or both

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[Error | Limit]
     """


    kwargs = _get_kwargs(
        scope=scope,
target=target,
body=body,

    )

    response = await client.get_async_httpx_client().request(
        **kwargs
    )

    return _build_response(client=client, response=response)

async def asyncio(
    scope: SetLimitScope,
    target: str,
    *,
    client: AuthenticatedClient,
    body: SetLimitType0 | SetLimitType1,

) -> Error | Limit | None:
    """ Add or change a fleet-wide concurrency and/or rate limit

    Args:
        scope (SetLimitScope):
        target (str):
        body (SetLimitType0 | SetLimitType1): Give a concurrency, a rate, or both

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Error | Limit
     """


    return (await asyncio_detailed(
        scope=scope,
target=target,
client=client,
body=body,

    )).parsed
