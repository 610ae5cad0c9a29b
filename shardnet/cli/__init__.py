"""The ``shardnet`` command: argument parsing that calls the layers below."""
