"""The ``dbmigrate`` command."""
