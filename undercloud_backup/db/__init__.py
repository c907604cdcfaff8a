"""MariaDB: connection and introspection, the dump, the pre-flight checks, table statistics, the
post-load comparison, the dump stream's gate, the scratch server and root's access through the
wrapper."""
