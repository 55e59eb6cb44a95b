"""The embeddable Trio job client: drive a queen from any Trio program."""
