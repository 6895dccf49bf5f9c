"""The HTTP edge: validates requests, records jobs and enqueues them by task name.

It imports the core only: no worker, no plugin, no DICOM library.
"""
