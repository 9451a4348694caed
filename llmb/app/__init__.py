"""The Gradio app behind `python app.py`: settings, lazily loaded models, training jobs, one module per tab."""
