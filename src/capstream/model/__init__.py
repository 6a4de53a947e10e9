"""The model call: chat-model builders, one attempt, the retry policy, rate limits, worker processes.

Nothing here imports the row, the run, the backends or the output folder (an import-linter
contract checks it), so a worker process (``python -m capstream.model.processes``) imports only
this package and LangChain.
"""
