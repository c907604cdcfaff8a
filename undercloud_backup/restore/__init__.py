"""Getting a backup back: the restore plan, files, databases and verification."""
