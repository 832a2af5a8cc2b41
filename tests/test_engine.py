"""The stream engine in-process: an answer's log and its readers, without HTTP."""

from __future__ import annotations

from itertools import islice

from streaming.config import Settings
from streaming.engine import Answer, tail_events
from streaming.providers.demo import DemoReply


def test_a_reader_past_the_end_of_an_ended_answer_stops():
    settings = Settings(demo_tokens=5, demo_tokens_per_s=0, demo_ttft_ms=0, heartbeat_s=0.05)
    reply = DemoReply(settings, [{"role": "user", "content": "x"}], None)
    answer = Answer(reply, message_id="m", conversation_id="c", model="demo", settings=settings).start()
    whole = [event for batch in tail_events(answer) for event in batch]
    assert whole[-1]["type"] == "done" and answer.ended
    # Once it waited for events that never come, and sent heartbeats (empty batches) for ever.
    assert list(islice(tail_events(answer, len(whole) + 3), 3)) == []
    assert list(islice(tail_events(answer, len(whole)), 3)) == []
