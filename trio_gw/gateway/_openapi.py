"""The admin API's OpenAPI 3.1 document, served at ``/openapi.json``.

Written by hand, next to the endpoints in ``_admin.py``; the tests call every
operation listed here and validate each response against its schema, and check
that the app serves no ``/api`` route this document leaves out.
"""

from __future__ import annotations

from typing import Any

from .._statistics import STATISTICS

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _responses(ok: str, *errors: int) -> dict[str, Any]:
    descriptions = {
        400: "The body or a query parameter is invalid; `detail` names the field.",
        401: "Missing or wrong API key.",
        403: "Refused as coming from a web page: a Host that is not the admin API's "
        "(DNS rebinding), or a state-changing request from another Origin.",
        404: "No such session on this hub.",
        413: "The message is larger than any client queue can hold.",
        503: "The hub is shutting down, or its command queue is full (retry later).",
    }
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": _json_content(_ref(ok))},
        "401": {"description": descriptions[401], "content": _json_content(_ref("Error"))},
        "403": {"description": descriptions[403], "content": _json_content(_ref("Error"))},
    }
    for status in errors:
        responses[str(status)] = {
            "description": descriptions[status],
            "content": _json_content(_ref("Error")),
        }
    return responses


def _post(summary: str, body: str, *errors: int) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": body[0].lower() + body[1:],
            "requestBody": {"required": True, "content": _json_content(_ref(body))},
            "responses": _responses("Count", 400, *errors, 503),
        }
    }


_PAGING = [
    {
        "name": "offset",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0, "maximum": (1 << 63) - 1, "default": 0},
    },
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    },
]

_CLOSE_FIELDS: dict[str, Any] = {
    "code": {
        "type": "integer",
        "default": 1000,
        "description": "1000, or an application code 3000..4999.",
        "anyOf": [{"const": 1000}, {"minimum": 3000, "maximum": 4999}],
    },
    "reason": {
        "type": "string",
        "default": "closed by admin",
        "maxLength": 123,
        "description": "At most 123 bytes of UTF-8 (a close frame's limit).",
    },
}

_USER_IDS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
_MESSAGE = {"description": "Any JSON value; a string is sent as it is, anything else as JSON."}


_HISTORY_FIELDS = [
    f"{counter}_{kind}"
    for counter in (
        "messages_in",
        "messages_out",
        "drops",
        "slow_consumer_closes",
        "backend_errors",
    )
    for kind in ("total", "per_second")
]


def _page_of(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["total", "offset", "limit", "items"],
        "properties": {
            "total": {"type": "integer"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
            "items": {"type": "array", "items": item},
        },
    }


_NODE_COUNTS = {
    "type": "object",
    "additionalProperties": {"type": "integer", "minimum": 1},
    "description": "Sessions per node id, for the nodes where there are some.",
}


def _with_complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the ``complete`` flag of answers that count the whole cluster."""
    schema["required"] = [*schema["required"], "complete"]
    schema["properties"]["complete"] = {
        "type": "boolean",
        "description": "False if the other nodes could not be asked (the backplane is "
        "down): the counts are this node's only.",
    }
    return schema


def _schemas() -> dict[str, Any]:
    nullable_number = {"type": ["number", "null"]}
    return {
        "Error": {
            "type": "object",
            "required": ["error", "detail"],
            "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
        },
        "Count": {
            "type": "object",
            "required": ["sessions"],
            "properties": {
                "sessions": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Sessions the command is addressed to, on every node "
                    "(this node's only while the backplane is down).",
                }
            },
        },
        "SendToSession": {
            "type": "object",
            "required": ["session_id", "message"],
            "additionalProperties": False,
            "properties": {"session_id": {"type": "string"}, "message": _MESSAGE},
        },
        "SendToUsers": {
            "type": "object",
            "required": ["user_ids", "message"],
            "additionalProperties": False,
            "properties": {"user_ids": _USER_IDS, "message": _MESSAGE},
        },
        "SendToAll": {
            "type": "object",
            "required": ["message"],
            "additionalProperties": False,
            "properties": {"message": _MESSAGE},
        },
        "CloseSession": {
            "type": "object",
            "required": ["session_id"],
            "additionalProperties": False,
            "properties": {"session_id": {"type": "string"}, **_CLOSE_FIELDS},
        },
        "CloseUsers": {
            "type": "object",
            "required": ["user_ids"],
            "additionalProperties": False,
            "properties": {"user_ids": _USER_IDS, **_CLOSE_FIELDS},
        },
        "CloseAll": {
            "type": "object",
            "additionalProperties": False,
            "properties": dict(_CLOSE_FIELDS),
        },
        "SessionInfo": {
            "type": "object",
            "required": [
                "session_id",
                "user_id",
                "username",
                "remote",
                "connected_at",
                "valid_until",
            ],
            "properties": {
                "session_id": {"type": "string"},
                "user_id": {"type": "string"},
                "username": {"type": "string"},
                "remote": {"type": ["string", "null"], "description": "host:port of the peer"},
                "connected_at": {"type": "number", "description": "Unix time"},
                "valid_until": {
                    **nullable_number,
                    "description": "Unix time the credentials expire (null: never)",
                },
            },
        },
        "SessionPage": _page_of(_ref("SessionInfo")),
        "UserPage": _with_complete(
            _page_of(
                {
                    "type": "object",
                    "required": ["user_id", "sessions", "nodes"],
                    "properties": {
                        "user_id": {"type": "string"},
                        "sessions": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "Sessions on every node of the cluster.",
                        },
                        "nodes": _NODE_COUNTS,
                    },
                }
            )
        ),
        "UserSessions": _with_complete(
            {
                "type": "object",
                "required": ["user_id", "items", "sessions", "nodes"],
                "properties": {
                    "user_id": {"type": "string"},
                    "items": {
                        "type": "array",
                        "items": _ref("SessionInfo"),
                        "description": "The user's sessions on this node.",
                    },
                    "sessions": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "The user's sessions on every node.",
                    },
                    "nodes": _NODE_COUNTS,
                },
            }
        ),
        "Cluster": _with_complete(
            {
                "type": "object",
                "required": ["node_id", "connections", "users", "nodes"],
                "properties": {
                    "node_id": {"type": "string", "description": "The node that answered."},
                    "connections": {"type": "integer", "minimum": 0},
                    "users": {"type": "integer", "minimum": 0},
                    "nodes": {
                        "type": "object",
                        "description": "Sessions and users per live node.",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["sessions", "users"],
                            "properties": {
                                "sessions": {"type": "integer", "minimum": 0},
                                "users": {"type": "integer", "minimum": 0},
                            },
                        },
                    },
                },
            }
        ),
        "Statistics": {
            "type": "object",
            "required": [
                "time",
                *(statistic.name for statistic in STATISTICS),
                "backend_inflight",
                "backend_max_inflight",
                "cluster",
                "backplane",
            ],
            "properties": {
                "time": {"type": "number"},
                **{
                    statistic.name: (
                        {"type": "object", "additionalProperties": {"type": "integer"}}
                        if statistic.kind == "by_label"
                        else {"type": "integer", "minimum": 0}
                    )
                    for statistic in STATISTICS
                },
                "backend_inflight": {"type": "integer", "minimum": 0},
                "backend_max_inflight": {"type": "integer", "minimum": 0},
                "cluster": _ref("Cluster"),
                "backplane": {
                    "type": ["object", "null"],
                    "description": "The Redis backplane's state and counters "
                    "(null: a single node, no [backplane] url).",
                },
            },
        },
        "History": {
            "type": "object",
            "required": ["started", "interval", "capacity", "samples"],
            "properties": {
                "started": {
                    **nullable_number,
                    "description": "Unix time the sampler started (null: not yet); "
                    "a new value means a new history, whose `seq` starts again at 1.",
                },
                "interval": {"type": "number", "description": "Seconds between samples."},
                "capacity": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The most samples kept: the oldest go first.",
                },
                "samples": {
                    "type": "array",
                    "items": _ref("HistorySample"),
                    "description": "Oldest first.",
                },
            },
        },
        "HistorySample": {
            "type": "object",
            "required": ["seq", "time", "connections", "users", *_HISTORY_FIELDS],
            "properties": {
                "seq": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Position in this history: 1, 2, 3... without gaps.",
                },
                "time": {"type": "number", "description": "Unix time of the reading"},
                "connections": {"type": "integer", "minimum": 0},
                "users": {"type": "integer", "minimum": 0},
                **{
                    name: {"type": "integer", "minimum": 0, "description": "The counter as read."}
                    if name.endswith("_total")
                    else {
                        "type": "number",
                        "minimum": 0,
                        "description": "The counter's growth since the sample before, per second.",
                    }
                    for name in _HISTORY_FIELDS
                },
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every ``/api`` endpoint."""
    get_page = {"parameters": _PAGING, "responses": _responses("SessionPage", 400)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trio_gw admin API",
            "version": "0.1.0",
            "description": "Send to and close sessions, users or everyone, and inspect the hub. "
            "Every operation needs `Authorization: Bearer <admin.api_key>`.",
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/api/send/session": _post("Send a message to one session", "SendToSession", 404),
            "/api/send/users": _post(
                "Send a message to every session of some users", "SendToUsers"
            ),
            "/api/send/all": _post("Send a message to every session", "SendToAll"),
            "/api/close/session": _post("Close one session", "CloseSession", 404),
            "/api/close/users": _post("Close every session of some users", "CloseUsers"),
            "/api/close/all": _post("Close every session", "CloseAll"),
            "/api/sessions": {
                "get": {"summary": "List sessions", "operationId": "listSessions", **get_page}
            },
            "/api/users": {
                "get": {
                    "summary": "List users with their session counts",
                    "operationId": "listUsers",
                    "parameters": _PAGING,
                    "responses": _responses("UserPage", 400),
                }
            },
            "/api/users/{user_id}/sessions": {
                "get": {
                    "summary": "One user's sessions",
                    "operationId": "userSessions",
                    "parameters": [
                        {
                            "name": "user_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": _responses("UserSessions"),
                }
            },
            "/api/statistics": {
                "get": {
                    "summary": "Hub statistics",
                    "operationId": "statistics",
                    "responses": _responses("Statistics"),
                }
            },
            "/api/history": {
                "get": {
                    "summary": "The last 15 minutes of statistics, one sample a second",
                    "operationId": "history",
                    "parameters": [
                        {
                            "name": "after",
                            "in": "query",
                            "description": "Only the samples whose `seq` is greater "
                            "(to poll for new ones).",
                            "schema": {
                                "type": "integer",
                                "minimum": 0,
                                "maximum": (1 << 63) - 1,
                                "default": 0,
                            },
                        }
                    ],
                    "responses": _responses("History", 400),
                }
            },
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
