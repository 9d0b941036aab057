"""``tiermem serve``: an OpenAI-compatible server whose chat sessions keep their KV memory between turns.

``app`` (routes), ``responses`` (/v1/responses), ``schemas`` (request bodies, errors), ``jobs`` (await a turn),
``turns`` (a turn and its text), ``worker`` (the model thread, continuous batching), ``batch`` (batched decode),
``sessions`` (prefix matching, RAM/disk tiers, limits), ``state`` (session files), ``metrics``, ``page``, ``cli``.
"""
