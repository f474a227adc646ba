// The image operations the SDK and the daemon offer, from the images layer
// (which they may not import directly): build from a recipe, list, remove.
export { buildImage, type BuildOptions, type BuildResult } from '../images/build.js';
export { checkRecipeShape, type ImageRecipe, RecipeSchema } from '../images/recipe.js';
export { type ImageListing, type ImageManifest, type ImageSpec, listImages, removeImage } from '../images/store.js';
