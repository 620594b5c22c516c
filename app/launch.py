"""``mlxkv chat`` in a terminal: the session from the chat flags, then the app."""

from __future__ import annotations


def run(args) -> int:
    from mlxkv.commands.chat import session_for_args

    from .app import ChatApp
    from .store import ChatStore

    if args.resume:
        ChatStore().read(ChatStore.check_name(args.resume))  # fail before loading the model
    session, resolved = session_for_args(args, quiet=True)
    ChatApp(session, model_name=resolved.alias or resolved.path.name, resume=args.resume).run()
    return 0
