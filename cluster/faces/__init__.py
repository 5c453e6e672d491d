"""Faces: MTCNN detection, subject tracking, aligned crops and paste-back."""
