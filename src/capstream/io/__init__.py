"""Input and output: the source dataset (``source``), the output folder (``layout``, ``store``,
``results_log``, ``summary``, ``card``) and the Hugging Face Hub (``hub``)."""
