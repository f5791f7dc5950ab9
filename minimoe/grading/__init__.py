"""What `minimoe grade` runs besides its command line (`minimoe.grade`).

- `kernel`: an IPython kernel for one student notebook, in a fresh folder, optionally in a
  bubblewrap sandbox; each cell's reply status, with timeouts.
- `harness`: the grader's code inside that kernel (sent as source before any student cell):
  it calls the learner's function on the grader's inputs, with minimoe's implementations of the
  task guarded, and sends the outputs back as data; and the safe decoding of them.
- `scan`: static analysis of the notebook's code, for answers that use minimoe's implementation.
- `implementations`: which of minimoe's objects implement each task.
"""
