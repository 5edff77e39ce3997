"""Seed 001's message parsing and template rendering (no Redis)."""

from __future__ import annotations

import msgspec
import pytest

from bridge.api.schemas import ChatMessage
from bridge.errors import BadRequest, UnknownModel
from bridge.providers.base import Message
from bridge.providers.registry import ProviderRegistry
from bridge.settings import Settings
from bridge.ws_protocol import (
    AddRequest,
    InvalidMessage,
    ListenRequest,
    build_job,
    parse_message,
    render,
    stream_settings,
)

SETTINGS = msgspec.structs.replace(
    Settings.from_env({"BRIDGE_MODELS": "gpt-3.5-turbo=openai:gpt-3.5-turbo,mock=mock:mock"}),
    openai_api_key="k",
)
TEMPLATE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"insert": "history"},
    {"role": "user", "content": "Question: {query}"},
]
HISTORY = [ChatMessage("user", "Where is {query}?"), ChatMessage("assistant", "In Paris.")]


def test_render_inserts_history_and_substitutes_the_query() -> None:
    """`{"insert": "history"}` becomes the history; `{query}` becomes the query."""
    assert render(TEMPLATE, "How tall?", HISTORY) == [
        Message("system", "You are a helpful assistant."),
        Message("user", "Where is {query}?"),
        Message("assistant", "In Paris."),
        Message("user", "Question: How tall?"),
    ]


@pytest.mark.parametrize(
    "query", ["{0}", "{history}", "{query}", "{{x}}", "{__class__.__mro__}", "%s"]
)
def test_render_keeps_braces_in_the_query_literal(query: str) -> None:
    """No format-string injection: the query is inserted as it is, never interpreted."""
    assert render(TEMPLATE, query, [])[-1] == Message("user", f"Question: {query}")


def test_render_leaves_other_braces_in_templates_alone() -> None:
    """Only `{query}` is a placeholder; `{name}` or `{}` in a template stay as written."""
    template = [{"role": "user", "content": "{name} {} {query}"}]
    assert render(template, "q", []) == [Message("user", "{name} {} q")]


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ({"insert": "memory"}, 'only {"insert": "history"} exists'),
        ({"insert": "history", "role": "user"}, 'only {"insert": "history"} exists'),
        ({"role": "user"}, "missing required field `content`"),
        ({"role": "wizard", "content": "x"}, "Invalid enum value 'wizard'"),
    ],
)
def test_render_rejects_unknown_template_items(item: dict[str, str], needle: str) -> None:
    """Template items that are neither a message nor the history insert are named."""
    with pytest.raises(BadRequest, match="template message 0") as caught:
        render([item], "q", [])
    assert needle in caught.value.detail


def test_parse_message_shapes() -> None:
    """Each known type decodes into its struct."""
    listen = parse_message('{"type": "listen", "job_id": "abc", "cursor": "m:1-0"}')
    assert listen == ListenRequest("listen", "abc", "m:1-0")
    add = parse_message(
        b'{"type": "add", "id": "x", "assistant": {"streams": [{"provider": "mock",'
        b' "settings": {"model": "mock"}, "messages": [{"role": "user", "content": "hi"}]}]}}'
    )
    assert isinstance(add, AddRequest)
    assert add.query == ""
    assert add.history == []


@pytest.mark.parametrize(
    ("text", "needle", "about"),
    [
        ("nope", "not a JSON object", {}),
        ("[1]", "not a JSON object", {}),
        ('{"type": 3}', "unknown message type 3", {}),
        ('{"type": "add", "id": "c1", "assistant": {"streams": []}}', "length >= 1", {"id": "c1"}),
        ('{"type": "cancel", "job_id": "a b"}', "matching regex", {"job_id": "a b"}),
    ],
)
def test_parse_message_errors_name_the_problem(
    text: str, needle: str, about: dict[str, str]
) -> None:
    """Invalid messages raise InvalidMessage saying why, naming the request or job if any."""
    with pytest.raises(InvalidMessage) as caught:
        parse_message(text)
    assert needle in caught.value.detail
    assert caught.value.about == about


def test_stream_settings_accept_snake_and_camel_case() -> None:
    """OpenAI-style names are mapped onto the provider params; the model is set apart."""
    model, params = stream_settings({"model": "m", "max_tokens": 5, "topP": 0.5})
    assert model == "m"
    assert params == {"max_tokens": 5, "top_p": 0.5}
    with pytest.raises(BadRequest, match="temperature"):
        stream_settings({"model": "m", "temperature": 9})


def test_build_job_maps_streams_to_a_model_and_fallbacks() -> None:
    """The first stream is the job; later streams become fallbacks; provider names resolve
    to the configured public model."""
    providers = ProviderRegistry.from_settings(SETTINGS)
    add = msgspec.convert(
        {
            "type": "add",
            "id": "c",
            "query": "q",
            "assistant": {
                "streams": [
                    {
                        "provider": "openai",
                        "settings": {"model": "gpt-3.5-turbo"},
                        "messages": TEMPLATE,
                    },
                    {
                        "provider": "mock",
                        "settings": {"model": "mock", "mock_tokens": 2},
                        "messages": TEMPLATE,
                    },
                ]
            },
        },
        AddRequest,
    )
    job = build_job(add, "job-1", "ws-job-1", providers, SETTINGS, 1.0)
    assert (job.request_id, job.session_id, job.model_id) == ("job-1", "ws-job-1", "gpt-3.5-turbo")
    assert job.messages[-1] == Message("user", "Question: q")
    assert [(f.model_id, f.params) for f in job.fallbacks] == [("mock", {"mock_tokens": 2})]


def test_alias_for_only_reaches_configured_routes() -> None:
    """A provider serves its configured models by alias or upstream name, nothing else."""
    providers = ProviderRegistry.from_settings(SETTINGS)
    assert providers.alias_for("openai", "gpt-3.5-turbo") == "gpt-3.5-turbo"
    assert providers.alias_for("mock", "mock") == "mock"
    with pytest.raises(UnknownModel, match="known models: mock"):
        providers.alias_for("mock", "gpt-3.5-turbo")
    with pytest.raises(BadRequest, match="unknown provider 'xai'; known providers: mock, openai"):
        providers.alias_for("xai", "grok")
