"""``python -m shardnet`` runs the command line."""

from shardnet.cli.main import program

program()
