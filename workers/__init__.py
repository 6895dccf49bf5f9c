"""The Celery app and job execution: runs transports into stores and keeps job state.

Workers import the core and the plugins, never the API.
"""
