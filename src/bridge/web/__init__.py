"""Static resources shipped in the package (the test page)."""
