"""buffer_service package."""
