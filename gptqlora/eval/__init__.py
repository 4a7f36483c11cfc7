"""Task accuracy by generation and scoring."""
