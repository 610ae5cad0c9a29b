"""Channels, replica lists, balancing and retry policy: how requests reach replicas."""
