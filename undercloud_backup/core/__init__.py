"""The foundation every other package builds on: errors and their exit statuses, the one subprocess
executor, sizes, the manifest's types and progress reporting."""
