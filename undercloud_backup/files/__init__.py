"""The filesystem side: the tar archive, its listings, incremental chains and the confinement of an
extraction to its target."""
