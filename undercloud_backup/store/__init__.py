"""Swift: the connection and its retry policy, the uploader and the strict reader, the catalogue of
backups, TempURLs, the space check and retention."""
