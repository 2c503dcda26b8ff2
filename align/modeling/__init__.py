"""Models and chat: loading and precision, chat templates, reward models, packed rows."""
