"""Files written whole or not at all (atomic.py): the bottom layer every writer of the project uses."""
