"""DataParallelRouter: least-loaded placement, prefix stickiness, and the load limit on it."""

from __future__ import annotations

from pagedllm.entrypoints.openai.dp_router import (
    CHUNK_CHARS,
    MAX_IMBALANCE,
    DataParallelRouter,
    prompt_text,
)

SYSTEM = "You are a careful assistant. " * 20  # several chunks


def test_unrelated_prompts_spread_to_the_least_loaded():
    router = DataParallelRouter(3)
    picks = [router.route(f"short prompt {i}") for i in range(6)]
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]
    router.done(1)
    assert router.route("another") == 1


def test_a_shared_prefix_stays_on_its_replica():
    router = DataParallelRouter(2)
    first = router.route(SYSTEM + "question one")
    router.done(first)
    router.route("unrelated " * 30)  # the other replica is now the least loaded
    for i in range(4):
        assert router.route(SYSTEM + f"question {i}") == first
    assert router.prefix_routed[first] == 4


def test_a_longer_matching_prefix_wins():
    router = DataParallelRouter(2)
    a = router.route(SYSTEM + "x" * CHUNK_CHARS * 2)
    b = router.route("other " * 60)
    assert a != b
    assert router.route(SYSTEM + "x" * CHUNK_CHARS * 2 + "more") == a


def test_an_overloaded_owner_gives_way():
    router = DataParallelRouter(2)
    owner = router.route(SYSTEM)
    for _ in range(MAX_IMBALANCE + 2):
        router.in_flight[owner] += 1
    assert router.route(SYSTEM + "next") != owner


def test_prompt_text_of_chats_and_completions():
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}
    assert prompt_text(chat) == "<system>S<user>U"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prompt_text(parts) == "<user>hi"
    assert prompt_text({"prompt": "abc"}) == "abc"
    assert prompt_text({"prompt": ["abc", "def"]}) == "abc"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert prompt_text({}) == ""
