"""`POST /register` and `POST /heartbeat`: agents announce themselves to every dispatcher.

The API checks the agent's token, validates the payload and publishes it to the control fanout;
it answers once the broker confirmed. The `endpoint` an agent gives is recorded, never called.
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from services.api.agent_auth import AgentCredentials, bearer_token
from services.api.bus import ApiBus
from services.api.completions import read_body
from services.api.validation import invalid_request, parse_json_object
from shared.errors import AuthenticationError
from shared.messages import AgentHeartbeat, AgentRegistration

MAX_CONTROL_BODY = 64 * 1024
CONTROL_BODY_TIMEOUT = 10.0  # seconds for a registration or heartbeat body to arrive
OK = b'{"status":"ok"}'


class AgentEndpoints:
    def __init__(self, bus: ApiBus, credentials: AgentCredentials) -> None:
        self.bus = bus
        self.credentials = credentials

    async def register(self, request: Request) -> Response:
        message = await self._read(request, AgentRegistration)
        assert isinstance(message, AgentRegistration)
        await self.bus.announce(message)
        return Response(OK, media_type="application/json")

    async def heartbeat(self, request: Request) -> Response:
        message = await self._read(request, AgentHeartbeat)
        assert isinstance(message, AgentHeartbeat)
        await self.bus.announce(message)
        return Response(OK, media_type="application/json")

    async def _read(
        self, request: Request, model: type[AgentRegistration] | type[AgentHeartbeat]
    ) -> BaseModel:
        authorization = request.headers.get("authorization")
        if bearer_token(authorization) is None:  # 401 before anything else is looked at
            raise AuthenticationError("Missing agent token: send `Authorization: Bearer <token>`.")
        payload = parse_json_object(
            await read_body(request, MAX_CONTROL_BODY, CONTROL_BODY_TIMEOUT)
        )
        try:
            message = model.model_validate(payload)
        except ValidationError as e:
            raise invalid_request(e, model) from e
        self.credentials.check(message.name, authorization)
        return message
