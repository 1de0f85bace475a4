"""The papers' experiments: the LCN figures (``figures``, ``consistency``), the table runner (``tables``) and the
tables' cells from MLflow (``table``)."""
