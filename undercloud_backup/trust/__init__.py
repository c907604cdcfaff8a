"""Who may read and who wrote a backup: age encryption and SSH signatures."""
