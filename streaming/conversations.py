"""Reading and deleting stored conversations."""

from __future__ import annotations

from flask import Blueprint, g, jsonify, request

from .errors import ApiError
from .params import number_field, request_fields
from .store import ConversationBusy
from .turns import busy, service, stop_answer

bp = Blueprint("conversations", __name__, url_prefix="/conversations")


@bp.get("")
def list_conversations():
    fields = request_fields(request)
    limit = number_field(fields, "limit", int, 1, 200) or 20
    before = number_field(fields, "before", float, 0, float("inf"))
    items = service().store.conversations(limit + 1, before, g.key_id)  # one more: are there older ones?
    items, more = items[:limit], len(items) > limit
    return jsonify(conversations=items, next_before=items[-1]["updated_at"] if more else None)


@bp.get("/<conversation_id>")
def get_conversation(conversation_id: str):
    conversation = service().store.conversation(conversation_id, g.key_id)
    if conversation is None:
        raise ApiError(404, "not_found", "no such conversation")
    return jsonify(conversation)


@bp.delete("/<conversation_id>")
def delete_conversation(conversation_id: str):
    try:
        deleted = service().store.delete(conversation_id, g.key_id)
    except ConversationBusy:
        raise busy() from None
    if not deleted:
        raise ApiError(404, "not_found", "no such conversation")
    return "", 204


@bp.post("/<conversation_id>/stop")
def stop(conversation_id: str):
    """End the answer streaming in the conversation, wherever it runs; answer with its turn
    (202 while its worker has not saved it yet)."""
    turn = stop_answer(conversation_id, g.key_id)
    return jsonify(turn), 200 if turn["status"] != "streaming" else 202
