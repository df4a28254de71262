"""`sd3fit report`: tables and figures drawn only from run folders' files; imports no training code."""
