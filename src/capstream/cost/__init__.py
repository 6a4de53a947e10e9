"""Cost: the price table and image-token rules (``pricing``), the live meter and budget (``meter``),
and ``capstream estimate`` (``estimate``)."""
